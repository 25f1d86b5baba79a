rule aggregate:
    """Every evaluation of every checkpoint into one typed Parquet table."""
    localrule: True
    input:
        losses=loss_eval_files(),
        downstream=downstream_eval_files(),
    output:
        out("runs.parquet"),
    log:
        out("logs", "aggregate.log"),
    benchmark:
        out("benchmarks", "aggregate.tsv")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.aggregate --out {output} {input.losses}"
        " --downstream {input.downstream} > {log} 2>&1"
