"""
The machinery a reader of the method can skip, one file a kind: settings.py (dataclass
fields to flags and back, refusals), devices.py (device, torchrun, memory checks),
files.py (atomic writes, checkpoints read with a clear error, the out-dir lock),
records.py (the data files read and checked), pictures.py, and entry.py (exit codes).

Nothing here knows about GAST; model.py, lora.py, data.py and gast.py are the method.
"""
