"""System plumbing the primitives stand on: kernel settings changed for a session and
restored even when udamon is killed (sysctl_guard, its watchdog process), mounts,
perf_event_open ring buffers and the page-fault tracepoint reader, and the kernel DAMON
sysfs driver.  Nothing here knows about regions, reports or sessions."""
