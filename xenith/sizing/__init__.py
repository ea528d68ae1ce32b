"""Sizing a config without building it: parameters, FLOPs per token, memory per device."""
