rule fit:
    """Every law form fitted per dataset; every run predicted with a 95% interval."""
    localrule: True
    input:
        layout.runs_table(),
    output:
        predictions=layout.predictions(),
        fits=layout.fits(),
    params:
        settings=fit_settings_json(),
    threads: 2
    log:
        layout.log("fit"),
    benchmark:
        layout.benchmark("fit")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.fit --runs {input} --settings {params.settings:q}"
        " --workers {threads} --predictions {output.predictions} --fits {output.fits}"
        " > {log} 2>&1"
