"""The control plane: the admin API on the gateway (`admin.py`) and `microserve ctl` (`ctl.py`)."""
