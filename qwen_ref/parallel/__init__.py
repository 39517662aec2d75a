"""Running one model over several processes: tensor parallelism (tp.py) and its launcher (launch.py)."""
