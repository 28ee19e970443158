"""Programs the tests start in fresh Python processes (`python -m tests.workers.<name>`)."""
