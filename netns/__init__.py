"""Network-namespace plumbing for the activator.

namespace  enter a netns on a dedicated thread; make sockets in it
nft        the pod's nftables table redirecting app ports to shadow ports
pod        local pods: netns, veth to the host bridge, address, teardown
links      their netlink work (pyroute2), run only by the helper process
plumber    that short-lived helper process and its client
process    the pause process and applications started inside a pod
bridge, ipam, runlock, errors, _libc: the parts pod builds on
pause, spawn  small stdlib-only programs run by process (not imported)

Nothing is imported here, so `import netns.namespace` does not need
libnftables or pyroute2.
"""
