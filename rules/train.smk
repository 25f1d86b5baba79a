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
