"""Stage 2: training a student against the cache. The epoch plan (plan.py), the data streams
(data.py, eval_data.py), target sources (targets.py) and the loss math (loss.py), the loop
(loop.py), its resumable state (state.py), evaluation (evaluate.py), the run log (run_log.py)
and validation curves (curves.py).
"""
