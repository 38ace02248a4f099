"""Putting runs onto a Slurm cluster: ``launch`` renders ``ettin.sbatch`` (shown as slurm/ettin.sbatch)
into the run directory and submits it. What a training process does inside the job (topology check,
preemption, requeue) is ettin.train's.

May import: ettin.train.config (to compose the run's config), ettin.store.
"""
