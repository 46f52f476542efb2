"""The process group and what runs over it: the one distributed-context object (``context``), the
shared-memory collectives between the ranks of one host (``localcomm``) and CPU/GPU SyncBatchNorm
(``syncbn``)."""
