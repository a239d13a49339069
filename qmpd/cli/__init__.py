"""The ``qmpd`` command line."""
