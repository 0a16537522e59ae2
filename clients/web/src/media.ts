/**
 * Images of media messages that are pictures ([`isPicture`]: a raster type, at most
 * [`MAX_PHOTO_BYTES`]): downloaded with the token (an `<img src>` could not send it) and shown
 * from `blob:` URLs. Other media is listed as a file and never downloaded by itself. A `blob:`
 * URL holds its bytes until it is revoked, so the cache is bounded: past [`MAX_PHOTOS`] photos
 * or [`MAX_BYTES`] bytes the least recently shown ones are revoked and forgotten (downloaded
 * again if shown again).
 *
 * A `blob:` URL is a page of the app's origin when opened by itself ("Open image in new
 * tab"), and the app's Content-Security-Policy does not follow it there: a blob typed as the
 * uploader said (`image/svg+xml`, `text/html`, any `+xml`) would run the uploader's script
 * with the person's session. So only raster pictures ([`PICTURE_TYPES`]), which run nothing,
 * are downloaded, and a blob takes the type the download names only if it is one of them;
 * anything else is typed as bytes, which a tab saves rather than shows. */
import type { CourierClient } from "@courier-chat/client";

/** The most photos kept as `blob:` URLs (far more than a screen shows at once). */
export const MAX_PHOTOS = 200;
/** The most bytes kept as `blob:` URLs. */
export const MAX_BYTES = 64 * 1024 * 1024;

/** The types a photo's `blob:` URL may have: raster pictures, which run no script. */
export const PICTURE_TYPES = new Set([
  "image/png",
  "image/jpeg",
  "image/gif",
  "image/webp",
  "image/avif",
  "image/apng",
  "image/bmp",
  "image/x-icon",
  "image/vnd.microsoft.icon",
]);

/** The largest picture shown (downloaded as the conversation is shown); a larger one is listed
 * as a file. The server takes uploads of up to 100 MiB by default, and anyone may message
 * anyone: a few such "photos" downloaded at once would take the tab's memory. */
export const MAX_PHOTO_BYTES = 16 * 1024 * 1024;

function essenceOf(mime: string): string {
  return mime.split(";")[0]!.trim().toLowerCase();
}

/** The type a downloaded photo's blob is given: its own if a raster picture, else bytes. */
export function blobType(mime: string): string {
  const essence = essenceOf(mime);
  return PICTURE_TYPES.has(essence) ? essence : "application/octet-stream";
}

/** Whether a media body is shown as a picture (and so downloaded): a raster picture of at most
 * [`MAX_PHOTO_BYTES`] (its type and size are the server's, from the upload). Anything else is
 * listed as a file, never downloaded by itself: an `<img>` shows nothing else, and fetching
 * it would cost its bytes for nothing. */
export function isPicture(media: { mime: string; size: number }): boolean {
  return PICTURE_TYPES.has(essenceOf(media.mime)) && media.size <= MAX_PHOTO_BYTES;
}

interface Cached {
  url: Promise<string>;
  /** Once downloaded: the `blob:` URL and its size. */
  ready?: { objectUrl: string; bytes: number };
}

export class MediaUrls {
  /** Least recently shown first. */
  private readonly cache = new Map<string, Cached>();
  private bytes = 0;

  constructor(private readonly client: CourierClient) {}

  url(mediaId: string): Promise<string> {
    const held = this.cache.get(mediaId);
    if (held) {
      // Shown again: now the most recent.
      this.cache.delete(mediaId);
      this.cache.set(mediaId, held);
      return held.url;
    }
    const cached: Cached = {
      url: this.client.downloadMedia(mediaId).then((file) => {
        const objectUrl = URL.createObjectURL(new Blob([file.bytes as BlobPart], { type: blobType(file.mime) }));
        cached.ready = { objectUrl, bytes: file.bytes.byteLength };
        this.bytes += file.bytes.byteLength;
        this.evict(mediaId);
        return objectUrl;
      }),
    };
    cached.url.catch(() => this.cache.delete(mediaId));
    this.cache.set(mediaId, cached);
    return cached.url;
  }

  /** Revokes the least recently shown downloaded photos until the cache is within its
   * bounds; `keep` (the photo just downloaded) and downloads in progress stay. */
  private evict(keep: string): void {
    for (const [mediaId, cached] of this.cache) {
      if (this.cache.size <= MAX_PHOTOS && this.bytes <= MAX_BYTES) return;
      if (mediaId === keep || !cached.ready) continue;
      URL.revokeObjectURL(cached.ready.objectUrl);
      this.bytes -= cached.ready.bytes;
      this.cache.delete(mediaId);
    }
  }
}
