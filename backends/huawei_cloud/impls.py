"""huawei-cloud implementations: none yet.

The RPC client is not written; until it is, every op runs the contract's reference on the host
(``apt_hal.explain()`` says so).
"""
