"""Pipeline schedules: no pipelining (gradient accumulation) today; 1F1B and interleaved plug in here."""
