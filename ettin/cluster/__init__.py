"""Putting runs onto a Slurm cluster: ``launch`` renders ``ettin.sbatch`` (shown as slurm/ettin.sbatch)
into the run directory and submits it, alone or as one job array of a suite's or a sweep's members;
``suite_members`` (a suite's members: their plan, state, and running them), ``sweep``.
What a training process does inside the job (topology check, preemption, requeue) is ettin.train's.

May import: ettin.train.config (to compose the run's config), ettin.store.
"""
