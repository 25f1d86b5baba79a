rule fit:
    input:
        layout.runs_table(),
    output:
        predictions=layout.predictions(),
        fits=layout.fits(),
    log:
        layout.log("fit"),
    benchmark:
        layout.benchmark("fit")
    """Every law form fitted per dataset; every run predicted with a 95% interval."""
    localrule: True
    conda:
        "../envs/fit.yaml"
    threads: 2
    params:
        settings=fit_settings_json(),
    shell:
        "python -m workflow.fit --runs {input} --settings {params.settings:q}"
        " --workers {threads} --predictions {output.predictions} --fits {output.fits}"
        " > {log} 2>&1"
