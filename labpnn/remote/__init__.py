"""The network side: the device server (`server`, with its lock/lease and reply cache), `RigClient`
(`client`), CurveZMQ keys and allow-lists (`security`), the live monitor (`monitor`) and the
``serve`` / ``replay`` commands (`cli`). Speaks ``protocols/PROTOCOL.md``; serves any
`PhysicalSystem`.

May import: ``labpnn.contract``, ``labpnn.rig``, ``labpnn.config``, ``labpnn.sessions``,
``labpnn.protocols``, ``labpnn.drivers.roles``. Never torch (the lab PC may not have it), never the
twin, training or benches.
"""
