"""``POST /api/v1/upload``: validate a CSV and queue its images."""

from __future__ import annotations

import logging

import attrs
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

import csvimg_server._bodies as body
from csvimg._errors import CallbackUrlError, ManifestError
from csvimg.manifest import Problem as ManifestProblem
from csvimg.webhooks import request_secret
from csvimg_server._errors import error
from csvimg_server._handlers.resource import Resource
from csvimg_server._options import UPLOAD_FIELDS, process_options, refused_callback
from csvimg_server._upload import BadUpload, TooLarge, Upload, check_declared_length, read_upload
from csvimg_server.auth import owner_of

__all__ = ["Uploads"]

log = logging.getLogger("csvimg.server")


def _problem(problem: ManifestProblem) -> body.Problem:
    return body.Problem(
        row=problem.row, column=problem.column, code=problem.code, message=problem.message
    )


@attrs.frozen
class Uploads(Resource):
    """The upload endpoint."""

    def routes(self) -> list[Route]:
        """``POST /api/v1/upload``."""
        return [Route("/api/v1/upload", self.upload, methods=["POST"], name="upload")]

    async def upload(self, request: Request) -> Response:
        """``POST /api/v1/upload``: validate a CSV and queue its images."""
        limit = self.settings.manifest.max_bytes
        upload: Upload | None = None
        try:
            check_declared_length(request.headers.get("content-length"), limit)
            upload = await read_upload(
                request.stream(),
                request.headers.get("content-type", ""),
                max_file_bytes=limit,
                allowed=UPLOAD_FIELDS,
            )
            if upload.file is None:
                raise BadUpload("missing the 'file' field with the CSV")
            fields = upload.fields
            callback = fields.get("callback_url", "").strip() or None
            if callback is not None:
                try:
                    callback = await self.engine.check_callback_url(callback)
                except CallbackUrlError as exc:
                    raise refused_callback(exc) from None
            options = process_options(fields, self.settings.options)
            try:
                job = await self.engine.submit(
                    upload.file,
                    callback_url=callback,
                    options=options,
                    owner=owner_of(request),
                    filename=upload.filename,
                )
            except ManifestError as exc:
                log.info("upload refused: %d problem(s) in %r", len(exc.errors), upload.filename,
                         extra={"owner": owner_of(request)})
                rejected = body.ValidationError(
                    error=str(exc), errors=[_problem(p) for p in exc.errors]
                )
                return rejected.response(400)
        except TooLarge as exc:
            response = error(413, str(exc))
            if exc.close or "content-length" not in request.headers:
                # uvicorn would otherwise read and drop the whole body: the
                # declared one when that is huge, a chunked one with no end.
                response.headers["Connection"] = "close"
            return response
        except BadUpload as exc:
            return error(400, str(exc))
        except ClientDisconnect:
            return error(400, "the client went away during the upload")
        finally:
            if upload is not None:
                upload.close()
        base = self.base_url(request)
        self.metrics.requests_submitted.inc()
        log.info(
            "upload accepted: request %s, %d images, file %r",
            job.id, job.total, upload.filename,
            extra={"request_id": job.id, "owner": job.owner},
        )
        accepted = body.UploadAccepted(
            request_id=job.id,
            status_url=f"{base}/api/v1/status/{job.id}",
            # The callback receiver needs this to verify the signatures; it is
            # derived, not stored, so it can only be shown here.
            callback_secret=(
                request_secret(self.settings.webhook_secret, job.id) if job.callback_url else None
            ),
        )
        return accepted.response()
