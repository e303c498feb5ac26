"""Official checkpoints -> vlp checkpoints (``vlp convert <kind> SRC DST``)."""
