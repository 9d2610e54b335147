"""refmodel: an executable, formally checked reference model of x86-64 paging,
the TLB and a hypervisor's memory virtualization.

Layers (data flows upward): ``arch`` (the Intel SDM Vol. 3A ch. 4 paging model),
``hv`` (domains and the three ways to virtualize memory), ``guest`` (a minimal
mode-agnostic guest kernel), ``account`` (events and costs), ``fast`` (numpy batch
paths), ``oracle`` (traces, replay, fixtures). Start reading at
:mod:`refmodel.arch.walk`.
"""

__version__ = "0.1.0"
