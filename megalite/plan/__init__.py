"""Layout planner: predicted step time and memory per rank for any model, sequence and cluster.

``megalite-plan`` (cli.py) ranks layouts; flops.py, memory.py and timing.py hold the model,
hardware.py the machine descriptions (JSON presets in ./hardware), calibrate.py measures this
machine, published.py holds published runs the model is checked against.
"""
