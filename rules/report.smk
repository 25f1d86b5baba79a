"""The report's figures and table: `snakemake --report report.html` collects every output
marked report() here into one self-contained page (captions in report/)."""


rule plot:
    """Loss against compute per dataset, and error against loss, as in the paper's Figure 1."""
    localrule: True
    input:
        runs=layout.runs_table(),
        predictions=layout.predictions(),
        fits=layout.fits(),
    output:
        report(
            layout.plot("scaling.png"),
            caption="../report/scaling.rst",
            category="Scaling laws",
            labels={"figure": "loss vs compute; error vs loss"},
        ),
    params:
        loss_eval=error_loss_eval(config),
    log:
        layout.log("plot"),
    benchmark:
        layout.benchmark("plot")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.plots --runs {input.runs} --predictions {input.predictions}"
        " --fits {input.fits} --loss-eval {params.loss_eval} --out {output} > {log} 2>&1"


rule target_table:
    """Every measured target's prediction, interval, actual value and relative error; the
    tasks' accuracies by predictability."""
    localrule: True
    input:
        predictions=layout.predictions(),
        fits=layout.fits(),
    output:
        report(
            layout.plot("targets.html"),
            caption="../report/targets.rst",
            category="Scaling laws",
            labels={"figure": "relative errors of the targets"},
        ),
    params:
        loss_eval=error_loss_eval(config),
    log:
        layout.log("target_table"),
    benchmark:
        layout.benchmark("target_table")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.targets --predictions {input.predictions} --fits {input.fits}"
        " --loss-eval {params.loss_eval} --out {output} > {log} 2>&1"


rule calibration_view:
    """Every measured target, predicted against actual with its 95% interval; coverage."""
    localrule: True
    input:
        layout.predictions(),
    output:
        report(
            layout.plot("calibration.png"),
            caption="../report/calibration.rst",
            category="Scaling laws",
            labels={"figure": "predicted vs actual, with intervals"},
        ),
    params:
        loss_eval=error_loss_eval(config),
    log:
        layout.log("calibration_view"),
    benchmark:
        layout.benchmark("calibration_view")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.calibration_view --predictions {input}"
        " --loss-eval {params.loss_eval} --out {output} > {log} 2>&1"


if not measured_elsewhere(config):

    rule plot_curves:
        """Every run's training loss against tokens: where a diverged or cut-short run shows."""
        localrule: True
        input:
            curve_files(),
        output:
            report(
                layout.plot("curves.png"),
                caption="../report/curves.rst",
                category="Training",
                labels={"figure": "training curves"},
            ),
        params:
            runs=curve_runs(),
        log:
            layout.log("plot_curves"),
        benchmark:
            layout.benchmark("plot_curves")
        conda:
            "../envs/fit.yaml"
        shell:
            "python -m workflow.curves --runs {params.runs:q} --out {output} > {log} 2>&1"
