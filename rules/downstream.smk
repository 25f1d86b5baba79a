rule build_suite:
    """The downstream task suite: offline items from held-out documents, or the paper's."""
    input:
        list(suite_sources().values()),
    output:
        directory(suite_dir()),
    params:
        settings=suite_settings(),
        hf_home=hf_home(),
    log:
        out("logs", "build_suite.log"),
    benchmark:
        out("benchmarks", "build_suite.tsv")
    conda:
        "../envs/downstream.yaml"
    shell:
        "HF_HOME={params.hf_home} python -m workflow.suite --settings {params.settings:q}"
        " --out {output} > {log} 2>&1"


rule evaluate_downstream:
    """One checkpoint on the suite through lm-eval, offline: accuracies and average error."""
    input:
        checkpoints=out("runs", RUN_DIR, "checkpoints"),
        suite=suite_dir(),
    output:
        summary=out("eval", RUN_DIR, "step{step}", f"downstream-{suite_name()}.json"),
        results=out("eval", RUN_DIR, "step{step}", f"lm-eval-{suite_name()}.json"),
    params:
        run=lambda wildcards: as_json(checkpoint_identity(run_of(wildcards), int(wildcards.step))),
        batch_size=config["downstream"]["batch_size"],
        device=config["train"]["device"],
        hf_home=hf_home(),
        # Not used by the command: recorded, so that a change to the run's training spec
        # re-runs its evaluations even when the new training failed and left no outputs.
        trained_with=lambda wildcards: as_json(train_spec(run_of(wildcards))),
    resources:
        **rule_resources(downstream_resources, config, run_of),
    log:
        out("logs", "evaluate_downstream", RUN_DIR, "step{step}.log"),
    benchmark:
        out("benchmarks", "evaluate_downstream", RUN_DIR, "step{step}.tsv")
    conda:
        "../envs/downstream.yaml"
    shell:
        "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME={params.hf_home}"
        " python -m workflow.downstream --checkpoint {input.checkpoints}/step{wildcards.step}"
        " --suite {input.suite} --run {params.run:q} --summary {output.summary}"
        " --results {output.results} --batch-size {params.batch_size}"
        " --device {params.device} --threads {threads} > {log} 2>&1"
