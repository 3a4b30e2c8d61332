"""Network boot on a real L2: the dnsmasq that answers DHCP/proxyDHCP and serves iPXE over TFTP.

settings.py holds the operator's choices, network.py and tftp.py look at the host, dnsmasq.py
turns a plan into a configuration (pure), prepare.py validates and builds the plan, supervisor.py
runs dnsmasq as the controller's child, leases.py reads its lease file.
"""
