// A tiny browser grpc-web client for Duplex, built only from Connect-ES. The test bundles it with esbuild
// (stubs from `buf generate` + protoc-gen-es, found under NODE_PATH as `duplex-stubs/...`) and drives it
// in headless Chromium; everything it sees lands in `window.duplex.state` for the test to read.
import { createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ChatService } from "duplex-stubs/duplex/chat/v1/chat_pb.js";
import { ConversationService } from "duplex-stubs/duplex/chat/v1/conversation_pb.js";

const state = { events: [], conversation: null, error: null };

function transportTo(baseUrl) {
  return createGrpcWebTransport({ baseUrl, useBinaryFormat: true });
}

// One SendMessage call; each event is recorded the moment it arrives, with the page's clock.
async function sendMessage(baseUrl, text) {
  const chat = createClient(ChatService, transportTo(baseUrl));
  state.events = [];
  state.error = null;
  try {
    const request = { message: { clientMessageId: `browser-${Date.now()}`, text } };
    for await (const response of chat.sendMessage(request)) {
      const { seq, turnId, kind } = response.event;
      state.events.push({
        kind: kind.case,
        seq: Number(seq),
        turnId,
        text: kind.case === "delta" ? kind.value.text : "",
        conversationId: kind.case === "sessionOpened" ? kind.value.conversationId : "",
        at: performance.now(),
      });
    }
  } catch (error) {
    state.error = String(error);
  }
  return state;
}

// A unary call on the same transport: the conversation the turn was stored in.
async function getConversation(baseUrl, conversationId) {
  const conversations = createClient(ConversationService, transportTo(baseUrl));
  try {
    const reply = await conversations.getConversation({ conversationId });
    state.conversation = {
      title: reply.conversation.title,
      roles: reply.messages.map((message) => message.role),
    };
  } catch (error) {
    state.error = String(error);
  }
  return state;
}

window.duplex = { state, sendMessage, getConversation };
