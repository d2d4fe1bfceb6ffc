"""fusedaccum's benchmark: `fusedaccum-bench` (or `python -m fusedaccum.bench`).

timing.py   median timers and the copy bandwidth of the device
cases.py    the cases: standard PyTorch vs fusedaccum on the same data, checked before timed
report.py   rich tables, and JSON / CSV / PNG in the output folder
__main__.py the command line

matplotlib and rich come with the [bench] extra: pip install 'fusedaccum[bench]'.
"""
