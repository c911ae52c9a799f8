"""Norms that exist only in the tests, each one file written as a contributor writes a norm for normlab: the
functional op, the module with ``@register_norm``, the float64 reference with ``@register_reference``.

The contract suite (``tests/_contract_cases.py``) imports every module here inside ``registry.temporary()`` and runs
on each norm with no other edit; the norm is in the registry only while its own contract cases run, so nothing
else (the export checks, ``normlab ls``, the benchmarks' variant list) ever sees it. Import these modules only
through the contract suite.
"""
