/**
 * Images of media messages: downloaded with the token (an `<img src>` could not send it)
 * and shown from `blob:` URLs, each downloaded once per page.
 */
import type { CourierClient } from "@courier-chat/client";

export class MediaUrls {
  private readonly urls = new Map<string, Promise<string>>();

  constructor(private readonly client: CourierClient) {}

  url(mediaId: string): Promise<string> {
    let url = this.urls.get(mediaId);
    if (!url) {
      url = this.client.downloadMedia(mediaId).then((file) => {
        return URL.createObjectURL(new Blob([file.bytes as BlobPart], { type: file.mime }));
      });
      url.catch(() => this.urls.delete(mediaId));
      this.urls.set(mediaId, url);
    }
    return url;
  }
}
