import os
import sys

# Spawned ranks import the worker modules by name; make this folder importable for them.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
