"""`python -m convert.inspect`: what a checkpoint or adapter holds and which conversions apply, from metadata alone."""
