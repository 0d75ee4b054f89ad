"""``omnitrain demo``: the whole path on data it makes itself (``run``), its corpus (``corpus``) and
its report (``report``)."""
