rule evaluate_loss:
    """Validation loss of one checkpoint on every validation set, with bootstrap intervals."""
    input:
        checkpoints=layout.checkpoints(RUN_DIR),
        validation=[layout.tokens(name, "val") for name in validation_sets()],
    output:
        [layout.loss_eval(RUN_DIR, STEP, name) for name in validation_sets()],
    log:
        layout.log("evaluate", RUN_DIR, checkpoint_name(STEP)),
    benchmark:
        layout.benchmark("evaluate", RUN_DIR, checkpoint_name(STEP))
    conda:
        "../envs/torch.yaml"
    resources:
        **rule_resources(evaluate_resources, config, run_of),
    params:
        checkpoint=layout.checkpoint(RUN_DIR, STEP),
        validation=as_json({name: layout.tokens(name, "val") for name in validation_sets()}),
        outputs=lambda wildcards, output: as_json(dict(zip(validation_sets(), output, strict=True))),
        run=lambda wildcards: as_json(checkpoint_identity(run_of(wildcards), int(wildcards.step))),
        max_tokens=config["validation"]["max_tokens"],
        bootstrap=config["validation"]["bootstrap"],
        batch_size=config["validation"]["batch_size"],
        device=config["train"]["device"],
        # Not used by the command: recorded, so that a change to the run's training spec
        # re-runs its evaluations even when the new training failed and left no outputs.
        trained_with=lambda wildcards: training_identity(run_of(wildcards)),
    shell:
        "python -m workflow.evaluate --checkpoint {params.checkpoint}"
        " --validation {params.validation:q} --outputs {params.outputs:q} --run {params.run:q}"
        " --max-tokens {params.max_tokens} --bootstrap {params.bootstrap}"
        " --batch-size {params.batch_size} --device {params.device} --threads {threads}"
        " > {log} 2>&1"
