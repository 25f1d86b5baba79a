if config["train"]["schedule"] == "cosine":

    rule train:
        """Train one model on exactly D = M x N tokens; resumes from its work folder if interrupted."""
        input:
            tokens=layout.tokens("{dataset}", "train"),
            tokenizer=rules.tokenizer.output,
        output:
            checkpoints=directory(layout.checkpoints(RUN_DIR)),
            curve=layout.curve(RUN_DIR),
            summary=layout.train_summary(RUN_DIR),
        log:
            layout.log("train", RUN_DIR),
        benchmark:
            layout.benchmark("train", RUN_DIR)
        conda:
            "../envs/torch.yaml"
        threads: config["train"]["threads"]
        priority: lambda wildcards: training_priority(run_of(wildcards))
        resources:
            **rule_resources(train_resources, config, run_of),
        params:
            spec=lambda wildcards: as_json(train_spec(run_of(wildcards))),
            work=layout.train_work(RUN_DIR),
            # How the job runs on what it was given: one process per GPU (plain python, or
            # torchrun with DDP/FSDP) and the engine settings, which leave the result alone.
            # Snakemake does not record a params function of the job's resources as a rerun
            # trigger, so changing these re-runs nothing (tests/test_pipeline.py checks it).
            launcher=lambda wildcards, resources: launch_command(job_gpus(resources)),
            engine=lambda wildcards, resources: as_json(train_engine(run_of(wildcards))),
        shell:
            "{params.launcher} -m workflow.train --spec {params.spec:q} --engine {params.engine:q}"
            " --threads {threads} --data {input.tokens} --tokenizer {input.tokenizer}"
            " --checkpoints {output.checkpoints} --curve {output.curve}"
            " --summary {output.summary} --work {params.work} >> {log} 2>&1"

else:

    rule trunk:
        """Warm up, then train at the peak learning rate, keeping the full training state at
        every branch point the size's runs need (train.schedule wsd)."""
        input:
            tokens=layout.tokens("{dataset}", "train"),
        output:
            layout.trunk_summary(TRUNK_DIR),
        log:
            layout.log("trunk", TRUNK_DIR),
        benchmark:
            layout.benchmark("trunk", TRUNK_DIR)
        conda:
            "../envs/torch.yaml"
        threads: config["train"]["threads"]
        priority: lambda wildcards: training_priority(trunk_of(wildcards))
        resources:
            **rule_resources(trunk_resources, config, trunk_of),
        params:
            spec=lambda wildcards: as_json(train_trunk_spec(trunk_of(wildcards))),
            states=layout.trunk_states(TRUNK_DIR),
            # How far the trunk trains is not part of what it is: as functions of the
            # resources, the branch points and engine settings are not recorded, so adding a
            # multiplier does not re-run the trunk job, nor (through it) the size's finished
            # runs; the new run's own job grows the trunk from its last kept state.
            branch_steps=lambda wildcards, resources: trunk_branch_steps(wildcards),
            launcher=lambda wildcards, resources: launch_command(job_gpus(resources)),
            engine=lambda wildcards, resources: as_json(train_engine(trunk_of(wildcards))),
        shell:
            "{params.launcher} -m workflow.trunk --spec {params.spec:q}"
            " --branch-steps {params.branch_steps:q} --engine {params.engine:q}"
            " --threads {threads} --data {input.tokens} --states {params.states}"
            " --summary {output} >> {log} 2>&1"

    rule train:
        """Decay one run from its trunk's state at its branch point to exactly D = M x N
        tokens; resumes from its work folder if interrupted."""
        input:
            tokens=layout.tokens("{dataset}", "train"),
            tokenizer=rules.tokenizer.output,
            trunk=layout.trunk_summary(TRUNK_DIR),
        output:
            checkpoints=directory(layout.checkpoints(RUN_DIR)),
            curve=layout.curve(RUN_DIR),
            summary=layout.train_summary(RUN_DIR),
        log:
            layout.log("train", RUN_DIR),
        benchmark:
            layout.benchmark("train", RUN_DIR)
        conda:
            "../envs/torch.yaml"
        threads: config["train"]["threads"]
        priority: lambda wildcards: training_priority(run_of(wildcards))
        resources:
            **rule_resources(cooldown_resources, config, run_of),
        params:
            spec=lambda wildcards: as_json(train_spec(run_of(wildcards))),
            cooldown=lambda wildcards: as_json(train_cooldown(run_of(wildcards))),
            work=layout.train_work(RUN_DIR),
            states=layout.trunk_states(TRUNK_DIR),
            branch_steps=lambda wildcards, resources: trunk_branch_steps(wildcards),
            launcher=lambda wildcards, resources: launch_command(job_gpus(resources)),
            engine=lambda wildcards, resources: as_json(train_engine(run_of(wildcards))),
        shell:
            "{params.launcher} -m workflow.train --spec {params.spec:q} --engine {params.engine:q}"
            " --cooldown {params.cooldown:q} --trunk-states {params.states}"
            " --branch-steps {params.branch_steps:q}"
            " --threads {threads} --data {input.tokens} --tokenizer {input.tokenizer}"
            " --checkpoints {output.checkpoints} --curve {output.curve}"
            " --summary {output.summary} --work {params.work} >> {log} 2>&1"
