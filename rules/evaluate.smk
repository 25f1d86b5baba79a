rule evaluate_loss:
    """Validation loss of one checkpoint on every validation set, with bootstrap intervals."""
    input:
        checkpoints=out("runs", RUN_DIR, "checkpoints"),
        validation=[out("tokens", name, "val") for name in validation_sets()],
    output:
        [out("eval", RUN_DIR, "step{step}", f"loss-{name}.json") for name in validation_sets()],
    params:
        validation=as_json({name: out("tokens", name, "val") for name in validation_sets()}),
        run=lambda wildcards: as_json(checkpoint_identity(run_of(wildcards), int(wildcards.step))),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        max_tokens=config["validation"]["max_tokens"],
        bootstrap=config["validation"]["bootstrap"],
        device=config["train"]["device"],
        # Not used by the command: recorded, so that a change to the run's training spec
        # re-runs its evaluations even when the new training failed and left no outputs.
        trained_with=lambda wildcards: as_json(train_spec(run_of(wildcards))),
    resources:
        **rule_resources(evaluate_resources, config, run_of),
    log:
        out("logs", "evaluate", RUN_DIR, "step{step}.log"),
    benchmark:
        out("benchmarks", "evaluate", RUN_DIR, "step{step}.tsv")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m workflow.evaluate --checkpoint {input.checkpoints}/step{wildcards.step}"
        " --validation {params.validation:q} --run {params.run:q} --out-dir {params.out_dir}"
        " --max-tokens {params.max_tokens} --bootstrap {params.bootstrap}"
        " --device {params.device} --threads {threads} > {log} 2>&1"
