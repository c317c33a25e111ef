import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (push_oracle) import as top-level modules
