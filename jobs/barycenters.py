"""Job entrypoint for plain ``ray job submit`` (what ``raybary submit`` runs, as a script).

    ray job submit --address http://HEAD:8265 --working-dir jobs \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python barycenters.py s3://BUCKET/batch.zarr s3://BUCKET/out --gpus-per-actor 1

Arguments are those of ``raybary run``; the run joins the job's cluster
(``--address auto`` is added). Needs raybary on the cluster (cluster.yaml
installs it) or shipped with ``jobs/runtime_env.source.yaml``.
"""

from raybary.cli.job_entry import main

if __name__ == "__main__":
    main()
