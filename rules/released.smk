rule ingest_released:
    """The paper's released testbed (exp_data) as runs.parquet, with the task groups it derives."""
    localrule: True
    input:
        config["released_dir"],
    output:
        runs=out("runs.parquet"),
        groups=out("error_groups.json"),
    log:
        out("logs", "ingest_released.log"),
    benchmark:
        out("benchmarks", "ingest_released.tsv")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.released --exp-data {input} --out {output.runs}"
        " --groups {output.groups} > {log} 2>&1"
