"""`surgery upcycle`'s machinery: the MoE plan whose experts start as copies of each dense FFN (``plan``), and
the router rows fitted on the source's own router inputs (``routers``: a step of the layer pass)."""
