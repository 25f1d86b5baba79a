rule train:
    """Train one model on exactly D = M x N tokens; resumes from RUN_DIR/work if interrupted."""
    input:
        tokens=out("tokens", "{dataset}", "train"),
        tokenizer=rules.tokenizer.output,
    output:
        checkpoints=directory(out("runs", RUN_DIR, "checkpoints")),
        curve=out("runs", RUN_DIR, "curve.parquet"),
        summary=out("runs", RUN_DIR, "train.json"),
    params:
        spec=lambda wildcards: as_json(train_spec(run_of(wildcards))),
        out_dir=lambda wildcards: out("runs", run_of(wildcards).key),
        # How the job runs on what it was given: one process per GPU (plain python, or
        # torchrun with DDP/FSDP) and the engine settings, which leave the result alone.
        # Snakemake does not record a params function of the job's resources as a rerun
        # trigger, so changing these re-runs nothing (tests/test_pipeline.py checks it).
        launcher=lambda wildcards, resources: launch_command(job_gpus(resources)),
        engine=lambda wildcards, resources: as_json(train_engine(run_of(wildcards))),
    threads: config["train"]["threads"]
    resources:
        **rule_resources(train_resources, config, run_of),
    log:
        out("logs", "train", "{dataset}", "{size}", "M{multiplier}.log"),
    benchmark:
        out("benchmarks", "train", "{dataset}", "{size}", "M{multiplier}.tsv")
    conda:
        "../envs/torch.yaml"
    shell:
        "{params.launcher} -m workflow.train --spec {params.spec:q} --engine {params.engine:q}"
        " --threads {threads}"
        " --data {input.tokens} --tokenizer {input.tokenizer} --out-dir {params.out_dir}"
        " >> {log} 2>&1"
