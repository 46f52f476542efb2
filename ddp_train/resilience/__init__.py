"""What keeps a run alive or makes its failure clear: the step clock (``steptime``), the hang
watchdog (``watchdog``), straggler reports (``stragglers``), start-up checks (``preflight``,
``rendezvous``), signals and preemption (``signals``), the status file (``status``), and the
restart policies of torchrun (``launch_agent``) and SLURM (``requeue``)."""
