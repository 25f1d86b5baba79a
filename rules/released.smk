rule ingest_released:
    """The paper's released testbed (exp_data) as runs.parquet, with the task groups it derives."""
    localrule: True
    input:
        config["released_dir"],
    output:
        runs=layout.runs_table(),
        groups=layout.error_groups(),
    log:
        layout.log("ingest_released"),
    benchmark:
        layout.benchmark("ingest_released")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.released --exp-data {input} --out {output.runs}"
        " --groups {output.groups} > {log} 2>&1"
