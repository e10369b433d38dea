# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fixtures.py
