"""Power control through a machine's BMC (docs/power.md).

address.py parses what an operator names (redfish://..., ipmi://...); vault.py seals BMC passwords
at rest; bmc.py is the narrow Bmc interface with a fake beside it; redfish.py (sushy) and ipmi.py
(pyghmi) are the real drivers, imported only when a BMC of their kind is used; service.py calls
them off the event loop with a timeout, polls power state and powers machines up for jobs.
"""
