"""The model runtime: repository, backends, version lifecycle and deployments.

Nothing here knows about AMQP; the transport (`worker.consumer`) calls into it.
"""
