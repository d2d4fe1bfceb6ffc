"""fusedaccum's benchmark: `fusedaccum-bench` (or `python -m fusedaccum.bench`).

timing.py   median timers and the copy bandwidth of the device
cases.py    the cases: standard PyTorch vs fusedaccum on the same data, checked before timed
report.py   tables (rich or plain text), and JSON / CSV / PNG in the output folder
__main__.py the command line

matplotlib (the PNG) and rich (live progress, coloured tables) are optional; they come with
the [bench] extra: pip install 'fusedaccum[bench]'. Without them the bench prints plain-text
tables and writes the JSON and CSV all the same.
"""
