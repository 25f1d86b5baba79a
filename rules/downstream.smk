rule build_suite:
    """The downstream task suite: offline items from held-out documents, or the paper's."""
    input:
        list(suite_sources().values()),
    output:
        directory(suite_dir()),
    log:
        layout.log("build_suite"),
    benchmark:
        layout.benchmark("build_suite")
    conda:
        "../envs/downstream.yaml"
    params:
        settings=suite_settings(),
        hf_home=hf_home(),
    shell:
        "HF_HOME={params.hf_home} python -m workflow.suite --settings {params.settings:q}"
        " --out {output} > {log} 2>&1"


rule evaluate_downstream:
    """One checkpoint on the suite through lm-eval, offline: accuracies and average error."""
    input:
        checkpoints=layout.checkpoints(RUN_DIR),
        suite=suite_dir(),
    output:
        summary=layout.downstream_summary(RUN_DIR, STEP, suite_name()),
        results=layout.lm_eval_results(RUN_DIR, STEP, suite_name()),
    log:
        layout.log("evaluate_downstream", RUN_DIR, checkpoint_name(STEP)),
    benchmark:
        layout.benchmark("evaluate_downstream", RUN_DIR, checkpoint_name(STEP))
    conda:
        "../envs/downstream.yaml"
    resources:
        **rule_resources(downstream_resources, config, run_of),
    params:
        checkpoint=layout.checkpoint(RUN_DIR, STEP),
        run=lambda wildcards: as_json(checkpoint_identity(run_of(wildcards), int(wildcards.step))),
        batch_size=config["downstream"]["batch_size"],
        device=config["train"]["device"],
        hf_home=hf_home(),
        # Not used by the command: recorded, so that a change to the run's training spec
        # re-runs its evaluations even when the new training failed and left no outputs.
        trained_with=lambda wildcards: training_identity(run_of(wildcards)),
    shell:
        "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME={params.hf_home}"
        " python -m workflow.downstream --checkpoint {params.checkpoint}"
        " --suite {input.suite} --run {params.run:q} --summary {output.summary}"
        " --results {output.results} --batch-size {params.batch_size}"
        " --device {params.device} --threads {threads} > {log} 2>&1"
