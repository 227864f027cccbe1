"""Training physical neural networks: datasets (`datasets`), physical-network building blocks
(`network`), physics-aware training (`pat`), the trainer with its pass counting, checkpoints and
reports (`trainer`, `counting`, `report`), drift probes that tell a change of the physics from a
twin's extrapolation (`drift`), every hidden layer bypassed in turn (`ablation`) and the ``train``
command (`cli`).

May import: ``labpnn.contract``, ``labpnn.sessions``, ``labpnn.config``, ``labpnn.remote`` (the
command reaches a rig), ``labpnn.twin``; never ``labpnn.benches`` and never
``labpnn.sim_instruments`` (training runs on whatever system it is given).
"""
