"""Stand-ins for vendor stacks that cannot run here, for GLUE tests only.

They prove that apt_hal's bindings call the vendor ops with the documented arguments and map the
results back to the contracts' layout. They are not the vendors' kernels: nothing tested with
them ran on Ascend or Gaudi hardware, and no conformance result comes from them.
"""
