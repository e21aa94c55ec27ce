"""Traffic generators for tests and demos: CAN from a database (:mod:`daq_agent.sim.can`), serial
frames from frame definitions (``daq_agent.sim.serial``)."""
