rule aggregate:
    """Every evaluation of every checkpoint into one typed Parquet table."""
    localrule: True
    input:
        losses=loss_eval_files(),
        downstream=downstream_eval_files(),
        training=[layout.train_summary(run.key) for run in trained_runs(config)],
    output:
        layout.runs_table(),
    log:
        layout.log("aggregate"),
    benchmark:
        layout.benchmark("aggregate")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.aggregate --out {output} {input.losses}"
        " --downstream {input.downstream} --training {input.training} > {log} 2>&1"
