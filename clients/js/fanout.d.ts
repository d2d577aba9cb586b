// Types for @fanout/client (dist/fanout.mjs, and the global `fanout` of dist/fanout.js).

/** A delivered message. `id` is its history position, null for a live-only (raw) message. */
export interface Message {
  channel: string;
  id: string | null;
  event: string | null;
  data: string;
}

export type Transport = 'ws' | 'sse' | 'poll';
export type State = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** An Error from the server or the network: `code` is the server's error code when it gave one. */
export interface FanoutError extends Error {
  code: string;
  status: number;
}

export interface StateInfo {
  /** connecting / open: the node and transport. */
  url?: string;
  transport?: Transport;
  /** reconnecting: which attempt this is (1-based) and the delay before it, in ms. */
  attempt?: number;
  delay?: number;
  /** reconnecting: why the last connection ended; closed: the permanent error, if any. */
  error?: FanoutError;
}

export interface SubscribeOptions {
  /** Default `auto`: WebSocket, then SSE, then long-poll; remembers what worked (sessionStorage). */
  transport?: 'auto' | Transport;
  /** Start position: one id for every channel (`"0"` = from the start of retained history), a compound id, or per channel. */
  since?: string | Record<string, string>;
  /** Subscriber token (JWT). WebSocket sends it as `?token=`, SSE and long-poll as `Authorization: Bearer`. */
  token?: string;
  /** Called for a fresh token when the server says the token expired (or it has, by its `exp`). */
  getToken?: () => string | Promise<string>;
  onMessage?: (msg: Message) => void;
  /** History could not cover the gap for this channel: messages were missed. Live delivery goes on. */
  onReset?: (channel: string) => void;
  onState?: (state: State, info: StateInfo) => void;
  /** A permanent error (e.g. 400 invalid_channel, 403): the subscription is closed. */
  onError?: (error: FanoutError) => void;
  /** Reconnect backoff: full jitter in [0, min(maxDelay, minDelay·2^attempt)). Defaults 500 and 30000 ms. */
  minDelay?: number;
  maxDelay?: number;
  /** Jitter when a node drains (close 1012, 503, `shutting_down`) before moving on. Default 250 ms. */
  elsewhereJitter?: number;
  /** SSE: the server's heartbeat interval; silent for two = reconnect. Default 15000 ms. */
  heartbeat?: number;
  /** WebSocket: `ping` op interval; no answer for two = reconnect. Default 15000 ms. */
  pingInterval?: number;
  /** Long-poll hold, in seconds. Default 25. */
  pollTimeout?: number;
  /** Replaces browser APIs (fetch, WebSocket, setTimeout, clearTimeout, now, random, storage, onOnline): for tests. */
  env?: Record<string, unknown>;
}

export interface Subscription {
  /** Stops for good; `onState('closed', {})`. */
  close(): void;
  /** The transport in use or being tried. */
  readonly transport: Transport;
  /** The last id seen per channel: pass as `since` to resume elsewhere. */
  positions(): Record<string, string>;
}

/** Subscribes to `channels` on one node or any of several (`baseUrl` list). */
export function subscribe(baseUrl: string | string[], channels: string[], opts?: SubscribeOptions): Subscription;

export interface PublishOptions {
  event?: string;
  /** Sent as `X-API-Key`. */
  apiKey?: string;
  idempotencyKey?: string;
  fetch?: typeof fetch;
}

export interface PublishResult {
  channel: string;
  id: string | null;
  subscribed: boolean;
  duplicate?: boolean;
}

/** Publishes with history; a list of channels answers `{results: [...]}`. Rejects with a FanoutError. */
export function publish(baseUrl: string | string[], channel: string, data: unknown, opts?: PublishOptions): Promise<PublishResult>;
export function publish(baseUrl: string | string[], channel: string[], data: unknown, opts?: PublishOptions): Promise<{ results: PublishResult[] }>;

// Building blocks, exported for tests and for clients of other kinds.
export const TRANSPORTS: Transport[];
export function parseId(id: string): [number, number] | null;
export function compareIds(a: string, b: string): number;
export function encodeCompound(positions: Record<string, string>): string;
export function parseCompound(id: string): Record<string, string> | null;
export function initialPositions(channels: string[], since?: string | Record<string, string>): Record<string, string>;
export function accept(positions: Record<string, string>, msg: Message): boolean;
export function backoff(attempt: number, min: number, max: number, random?: () => number): number;
export function transportOrder(option: string | undefined, remembered: string | null): Transport[];
export type Outcome = 'token' | 'elsewhere' | 'fatal' | 'retry';
export function classifyStatus(status: number, code?: string): Outcome;
export function classifyClose(code: number): Outcome;
export function classifyReason(reason: string): Outcome;
export function classifyCode(code: string): Outcome;
export function jwtExpiry(token: string): number | null;
export function apiError(status: number, body?: { error?: string; message?: string } | null, fallback?: string): FanoutError;
export interface SseEvent { event: string; data: string; id: string }
export class SseParser {
  retry: number | null;
  comments: number;
  lastId: string;
  feed(text: string): SseEvent[];
}
