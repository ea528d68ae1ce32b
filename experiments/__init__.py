"""Experiment configs: `python main.py --config=experiments/<name>.py[:arg]`."""
